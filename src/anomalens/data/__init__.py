"""Dataset readers, robust image IO and the synthetic defect generator."""

from anomalens.data.io import ImageReadError, list_images, load_image, load_mask

__all__ = ["ImageReadError", "list_images", "load_image", "load_mask"]
