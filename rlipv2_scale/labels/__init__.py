"""Label spaces (`space.LabelSpace`: objects, verbs, valid combinations, zero-shot splits) and the
benchmarks' label lists (`metadata`: HICO-DET, V-COCO) - the base layer that data readers, models'
post-processing and the evaluators share."""
