"""Configuration presets (YAML), installed as package data of ``tnlbt.presets``.

``tnlbt.config.resolve_preset`` reads them through :mod:`importlib.resources`, so a wheel or a non-editable
install finds them too. A preset may start from another one with ``extends: NAME`` and list only the keys
that differ (the ablation presets are such overlays on ``demo_cpu``).
"""
