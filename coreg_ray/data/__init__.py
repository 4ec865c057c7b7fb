"""Image tables, annotation tables, candidate-label generators and device augmentation."""
from coreg_ray.data.annotations import (AnnotationTable, annotation_stats, candidate_matrix,
                                        merge_annotations, read_annotations, write_annotations)
from coreg_ray.data.noise import (SimulatedVLM, apply_few_shot, few_shot_indices, simulate_vlm_annotator,
                                  synthetic_annotations, synthetic_candidates)
from coreg_ray.data.tables import ImageTable, load_image_table, table_from_arrays, write_image_table

__all__ = ["AnnotationTable", "SimulatedVLM", "ImageTable", "annotation_stats", "apply_few_shot",
           "candidate_matrix", "few_shot_indices", "load_image_table", "merge_annotations",
           "read_annotations", "simulate_vlm_annotator", "synthetic_annotations",
           "synthetic_candidates", "table_from_arrays", "write_annotations", "write_image_table"]
