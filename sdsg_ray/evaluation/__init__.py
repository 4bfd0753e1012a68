"""FID/KID and the paper's comparisons (Tables 1/3, Fig. 7, Fig. 4) plus the HTML report."""

from sdsg_ray.evaluation.evaluate import Distances, distance_labels, distances, outlier_detection, run_evaluation
from sdsg_ray.evaluation.report import write_report

__all__ = ["Distances", "distance_labels", "distances", "outlier_detection", "run_evaluation", "write_report"]
