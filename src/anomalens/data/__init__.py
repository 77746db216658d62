"""Dataset readers, robust image IO, few-shot sampling and the synthetic defect generator."""

from anomalens.data.folder import make_folder_index
from anomalens.data.io import ImageReadError, list_images, load_image, load_mask
from anomalens.data.meta import read_meta_json, write_meta_json
from anomalens.data.mvtec import make_mpdd_index, make_mvtec_index
from anomalens.data.prompt_lists import PromptList, read_prompt_list
from anomalens.data.registry import get_index, list_categories, list_datasets
from anomalens.data.sampling import sample_shots
from anomalens.data.synthetic import generate_synthetic_dataset, list_synthetic_categories

__all__ = [
    "ImageReadError",
    "PromptList",
    "generate_synthetic_dataset",
    "get_index",
    "list_categories",
    "list_datasets",
    "list_images",
    "list_synthetic_categories",
    "load_image",
    "load_mask",
    "make_folder_index",
    "make_mpdd_index",
    "make_mvtec_index",
    "read_meta_json",
    "read_prompt_list",
    "sample_shots",
    "write_meta_json",
]
