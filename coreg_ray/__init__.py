"""coreg-ray: distil vision-language models into small image classifiers with Co-Reg.

The core (`coreg_ray.data`, `coreg_ray.coreg`, `coreg_ray.baselines`) is plain PyTorch and needs
neither Ray nor MLflow; `coreg_ray.distributed` and `coreg_ray.annotate` import those lazily.
"""
from coreg_ray.errors import CoregError

__version__ = "0.1.0"

__all__ = ["CoregError", "CoReg", "Config", "load_image_table", "read_annotations", "__version__"]


def __getattr__(name):  # lazy: `import coreg_ray` stays cheap
    if name == "CoReg":
        from coreg_ray.coreg.trainer import CoReg
        return CoReg
    if name == "Config":
        from coreg_ray.config import Config
        return Config
    if name == "load_image_table":
        from coreg_ray.data.tables import load_image_table
        return load_image_table
    if name == "read_annotations":
        from coreg_ray.data.annotations import read_annotations
        return read_annotations
    raise AttributeError(name)
