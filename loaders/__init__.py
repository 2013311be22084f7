"""Reading model files safely and driving diffusers/transformers objects. Knows nothing of ComfyUI."""
