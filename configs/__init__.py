"""The experiment configs, shipped as ``fastwsss.configs``: one YAML per experiment, differences from the schema in
``fastwsss/config.py`` only. ``--config NAME`` finds them by name from any directory; ``python -m fastwsss.train
--help`` lists them with their purpose (each file's first line)."""
