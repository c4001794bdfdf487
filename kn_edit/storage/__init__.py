"""Storage and configuration: atomic, never-overwriting writes (:mod:`.atomic`) and the OmegaConf structured-config
helpers every command and editor builds its settings with (:mod:`.config`). Depends on nothing in kn_edit but
``errors``."""
