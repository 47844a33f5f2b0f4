"""The detector: torchvision Faster R-CNN builders, pretrained weights by name, trained models."""
