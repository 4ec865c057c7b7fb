"""Image tables, annotation tables, candidate-label generators and device augmentation."""
from coreg_ray.data.annotations import (AnnotationTable, annotation_stats, candidate_matrix,
                                        merge_annotations, read_annotations, write_annotations)
from coreg_ray.data.noise import (apply_few_shot, few_shot_indices, synthetic_annotations,
                                  synthetic_candidates, true_label_annotations)
from coreg_ray.data.tables import ImageTable, load_image_table, table_from_arrays, write_image_table


def __getattr__(name):
    # The weak-template stand-in annotator moved to coreg_ray.annotate.weak_templates; it is
    # re-exported lazily so that importing coreg_ray.data loads nothing of coreg_ray.annotate.
    if name in ("SimulatedVLM", "simulate_vlm_annotator"):
        from coreg_ray.annotate import weak_templates
        return getattr(weak_templates, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_run_inputs(images, annotations, test_images=None, image_size=None, limit=None):
    """A training run's tables from paths or already-loaded objects: (train, test or None,
    annotations aligned to the training ids). Used by `coreg-ray train` on one process and on
    Ray Train, so both check the same things in the same order."""
    from pathlib import Path

    is_path = lambda x: isinstance(x, (str, Path))  # noqa: E731
    train = load_image_table(images, image_size, limit) if is_path(images) else images
    test = load_image_table(test_images, image_size) if is_path(test_images) else test_images
    ann = annotations if isinstance(annotations, AnnotationTable) else \
        read_annotations(annotations, train.num_classes)
    ann = ann.align_to(train.ids, str(annotations) if is_path(annotations) else "annotations")
    return train, test, ann


__all__ = ["AnnotationTable", "SimulatedVLM", "ImageTable", "annotation_stats", "apply_few_shot",
           "candidate_matrix", "few_shot_indices", "load_image_table", "load_run_inputs", "merge_annotations",
           "read_annotations", "simulate_vlm_annotator", "synthetic_annotations",
           "synthetic_candidates", "table_from_arrays", "true_label_annotations", "write_annotations", "write_image_table"]
