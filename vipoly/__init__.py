"""vipoly."""


def __getattr__(name: str):
    # `from vipoly import PolyEmbedder` works, but `import vipoly.config` (every Ray worker, every
    # entrypoint's argument parsing) does not pay for importing torch and transformers.
    if name in ("PolyEmbedder", "EmbedOutput"):
        from vipoly import model

        return getattr(model, name)
    raise AttributeError(f"module 'vipoly' has no attribute {name!r}")
