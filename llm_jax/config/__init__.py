"""The typed config: the schema (`schema`, `model`) and how presets, YAML files and KEY=VALUE
overrides become a validated `Config` (`loader`)."""

from llm_jax.config.loader import (
                                   CONFIG_FILE,
                                   CONFIGS_DIR,
                                   EXECUTION_KEYS,
                                   RUN_IDENTITY_KEYS,
                                   all_keys,
                                   check_compatible,
                                   dump_yaml,
                                   identity,
                                   key_docs,
                                   load_config,
                                   preset_names,
                                   read_run_config,
                                   read_yaml_mapping,
                                   validate,
)
from llm_jax.config.model import ModelConfig, MoEConfig, SSMConfig
from llm_jax.config.schema import Config

__all__ = ["CONFIG_FILE", "CONFIGS_DIR", "EXECUTION_KEYS", "RUN_IDENTITY_KEYS", "Config", "ModelConfig",
           "MoEConfig", "SSMConfig", "all_keys", "check_compatible", "dump_yaml", "identity", "key_docs",
           "load_config", "preset_names", "read_run_config", "read_yaml_mapping", "validate"]
