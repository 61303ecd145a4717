"""Build the API reference of lightning_diffusion from its docstrings with pdoc, treating pdoc's
warnings as errors.

    pip install -e ".[docs]"
    python docs/build.py                 # writes site/index.html (open it in a browser)
    python docs/build.py --out DIR

The reference documents the public API, the names of ``lightning_diffusion.__all__`` (pdoc follows
``__all__``; every other name is private by convention). Docstrings are Google style (``Args:``,
``Returns:``) with reStructuredText roles (``:class:`...```), which pdoc converts.

pdoc has no strict mode of its own: it reports problems (a name in ``__all__`` that does not resolve,
a module that fails to import, an annotation it cannot parse, a docstring it cannot convert) as
Python warnings and carries on. Here every warning raised from pdoc's code is printed and makes the
build fail (exit status 1); warnings of other libraries during import are left alone.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def build(out: Path) -> list[str]:
    """Render the reference into ``out``; return pdoc's warnings (empty when the build is clean)."""
    import pdoc
    import pdoc.render

    import lightning_diffusion

    for name in lightning_diffusion.__all__:  # the public names are lazy (PEP 562): resolve them for pdoc
        getattr(lightning_diffusion, name)
    pdoc.render.configure(docformat="google", footer_text=f"lightning-diffusion {lightning_diffusion.__version__}",
                          search=True, show_source=True)
    pdoc_dir = Path(pdoc.__file__).resolve().parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc("lightning_diffusion", output_directory=out)
    return [f"{w.category.__name__}: {w.message}" for w in caught
            if Path(w.filename).resolve().is_relative_to(pdoc_dir)]


def main(argv: list[str] | None = None) -> int:
    """Build into ``--out``; print pdoc's warnings and return 1 if there are any, else 0."""
    parser = argparse.ArgumentParser(description="Build the API reference (pdoc, warnings as errors).")
    parser.add_argument("--out", type=Path, default=Path("site"), help="output directory (default: site)")
    args = parser.parse_args(argv)
    problems = build(args.out)
    for problem in problems:
        print(f"docs/build.py: {problem}", file=sys.stderr)
    if problems:
        print(f"docs/build.py: {len(problems)} pdoc warning(s), treated as errors", file=sys.stderr)
        return 1
    print(f"API reference: {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
