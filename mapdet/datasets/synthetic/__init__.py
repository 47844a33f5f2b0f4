"""A synthetic Mapillary Vistas download: street scenes, shapes, the raw layout writer."""
