"""Pure functions on state dicts: key names, shapes, metadata. No pipelines, no ComfyUI, no files."""
