"""CK-CoOp (arXiv 2403.11631): CoOp whose learned change per token is a mix of K-means centres
of the token-embedding table (apply.codebook of them) plus a small Kronecker-product term."""

from .method import Method


def prompt(tokens, width, spec, loaded):
    from .prompting import CodebookChange, codebook

    return CodebookChange(tokens, width, codebook(loaded, spec.codebook))


METHOD = Method("ck-coop", "prompt vectors as mixes of embedding-table centres + a Kronecker term", prompt=prompt,
                lr=2e-3)  # not tuned
