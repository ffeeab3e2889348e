"""Generated files match their sources: src/nextbest/v1 (`make proto`) and README's config
reference (`make docs`)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"
GENERATED = REPO / "src" / "nextbest" / "v1"


def test_generated_code_is_up_to_date(tmp_path: Path):
    sources = sorted(
        str(p.relative_to(PROTOS)) for p in (PROTOS / "nextbest" / "v1").glob("*.proto")
    )
    assert sources, "no .proto files under protos/nextbest/v1"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{files('grpc_tools') / '_proto'}",  # well-known types, as `python -m grpc_tools.protoc`
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *sources,
    ]
    assert protoc.main(args) == 0
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "nextbest" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.glob("*_pb2*.py*")}
    assert sorted(committed) == sorted(fresh), "generated files differ: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `make proto`"


def test_readme_config_reference_is_up_to_date(tmp_path: Path):
    """README's "Every key" is generated from config.py's docstrings: `make docs` after a change."""
    from nextbest.config import write_reference

    copy = tmp_path / "README.md"
    copy.write_text((REPO / "README.md").read_text())
    assert not write_reference(copy), "README's config reference is stale: run `make docs`"
    assert "| `max_concurrent_streams` | `4` |" in copy.read_text()
