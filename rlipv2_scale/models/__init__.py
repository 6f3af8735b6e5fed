"""RLIPv2 models: configs (`config.named_config`), `rlipv2.build_model`, matcher, losses, post-processing."""
