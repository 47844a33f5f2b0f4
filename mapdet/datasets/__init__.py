"""Raw datasets in the Mapillary Vistas layout: the reader (v1.2, v2.0) and the synthetic generator."""
