"""Model families; `registry.build_model` picks one by `model.arch`."""
