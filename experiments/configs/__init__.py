"""Training configs, one per run of SPEC section 7, plus the CPU demo.

Each module has ``get_config() -> ml_collections.ConfigDict``; pass its path to
``python -m experiments.train --config=experiments/configs/NAME.py`` (or just
``--config=NAME``) and override any field with ``--config.FIELD=VALUE``.
"""
