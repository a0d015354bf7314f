"""Pseudo labels (docs/methods/toco-mcc.md §3 step 1, §4): multi-scale CAMs, CAM -> label, the PAR-refined segmentation label, the token
affinity label and the roi map of the local views. No trainable parameters; everything runs in fp32 under autocast."""

from .cams import box_mask, cam_to_label, ignore_outside_box, minmax_normalize, multiscale_cams
from .labels import PseudoLabeller, affinity_label, refine_seg_label, roi_map, scale_box

__all__ = ["PseudoLabeller", "affinity_label", "box_mask", "cam_to_label", "ignore_outside_box", "minmax_normalize", "multiscale_cams",
           "refine_seg_label", "roi_map", "scale_box"]
