"""Run ComfyUI workflows without ComfyUI: a UI-to-API converter, an executor and stand-ins for
ComfyUI's LoadImage / SaveImage / PreviewImage. Not used when the pack runs inside ComfyUI."""
