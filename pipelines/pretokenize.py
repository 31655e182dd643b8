"""Pre-tokenise the text sources of a training config, so that training reads token ids instead of
tokenising as it streams (vipoly.data.pretokenized):

    python -m pipelines.pretokenize --config configs/qwen2vl-2b.yaml [--set data.root=...]
"""
from __future__ import annotations

from typing import Any

from vipoly.data.pretokenized import default_cache, fingerprint, tokenize_file
from vipoly.data.tokenize import text_encoder
from vipoly.ray_init import init_ray


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m pipelines.pretokenize --config CFG [--set ...]`: pre-encode the text sources of
    `data.mix` for `model.backbone` into `data.encoded_dir`, one Ray task per file. Training then
    reads them instead of tokenising on the fly. `<run.dir>/inputs` is written first, as
    `pipelines.train` writes it, so that both see the same tokenizer and `model.max_length`."""
    import argparse
    import sys

    import ray
    from tqdm import tqdm

    from vipoly.config import add_config_args, config_from_args
    from vipoly.data.stream import resolve_sources
    from vipoly.model.inputs import write_inputs

    parser = argparse.ArgumentParser(prog="python -m pipelines.pretokenize", description=main.__doc__.split("\n")[0])
    cfg = config_from_args(add_config_args(parser).parse_args(argv))
    cache = default_cache(cfg.data)
    if not cache:
        parser.error("no cache folder: set data.encoded_dir or data.root")
    inputs_dir = write_inputs(cfg)
    text_encoder(inputs_dir)  # a wrong model folder fails here, before any task starts
    files = sorted({f for fs in resolve_sources(cfg.data).values() for f in fs})
    init_ray(cfg.run.ray_address, verbose=cfg.run.verbose)
    task = ray.remote(num_cpus=1)(tokenize_file)  # ray: one file per task
    pending = [task.remote(f, cache, inputs_dir) for f in files]
    done = []
    with tqdm(total=len(pending), desc="tokenising files", unit="file", disable=not sys.stderr.isatty()) as bar:
        while pending:
            ready, pending = ray.wait(pending)  # ray
            done += ray.get(ready)  # ray
            bar.update(len(ready))
    written = [d for d in done if d["rows"]]
    summary = {"cache": f"{cache}/{fingerprint(inputs_dir)}", "files": len(written), "rows": sum(d["rows"] for d in written),
               "skipped": {d["source"]: d["skipped"] for d in done if not d["rows"]}}
    print(f"pre-tokenised {summary['rows']} rows of {len(written)} files into {summary['cache']}; "
          f"{len(summary['skipped'])} files left to tokenise as they stream (images or empty)")
    return summary


if __name__ == "__main__":
    main()
