"""The input seam: methods that change what the model sees before its first layer (virtual tokens
prepended to the embeddings: prompt tuning, p-tuning, multitask prompt tuning)."""
