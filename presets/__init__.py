"""Preset YAML files, shipped inside the reshape package as reshape._presets."""
