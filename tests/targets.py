"""Hand-made ground truth for the matcher and loss tests."""
import torch

from rlipv2_scale.data.batch import Target


def make_target(sub_boxes, obj_boxes, sub_labels, obj_labels, rel_labels) -> Target:
    sub_boxes = torch.as_tensor(sub_boxes, dtype=torch.float32).reshape(-1, 4)
    obj_boxes = torch.as_tensor(obj_boxes, dtype=torch.float32).reshape(-1, 4)
    n = sub_boxes.shape[0]
    rel = torch.as_tensor(rel_labels, dtype=torch.float32)
    return Target(
        image_id=0, orig_size=(100, 100), size=(100, 100),
        boxes=torch.cat([sub_boxes, obj_boxes]), labels=torch.zeros(2 * n, dtype=torch.long),
        sub_index=torch.arange(n), obj_index=torch.arange(n) + n,
        sub_boxes=sub_boxes, obj_boxes=obj_boxes,
        sub_labels=torch.as_tensor(sub_labels, dtype=torch.long).reshape(-1),
        obj_labels=torch.as_tensor(obj_labels, dtype=torch.long).reshape(-1),
        rel_labels=rel if rel.dim() == 2 else rel.reshape(n, -1),
    )
