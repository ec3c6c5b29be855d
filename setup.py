"""The one thing pyproject.toml cannot say: the package's long description is README.md without the YAML header
a Hugging Face Space reads at its top (PyPI would show it as text). README.md stays the one source."""

from pathlib import Path

from setuptools import setup

README = (Path(__file__).parent / "README.md").read_text(encoding="utf-8")


def without_front_matter(text: str) -> str:
    """`text` without a leading YAML block, "---" lines around it."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 3)
        if end != -1:
            return text[end + len("\n---\n") :].lstrip("\n")
    return text


setup(long_description=without_front_matter(README), long_description_content_type="text/markdown")
