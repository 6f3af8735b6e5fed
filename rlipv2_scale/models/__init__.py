"""RLIPv2 models: configs (`config.named_config`), `build.build_model` / `build.load_pretrained`, matcher, losses, post-processing."""
