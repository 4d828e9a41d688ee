"""Bind a release tag to the project version: `make package TAG=v0.1.0` (and CI on a version tag).

    python -m tsforge.packaging.release check-tag v0.1.0

Archive versions are PROJECT_VERSION-rREVISION (tsforge.project.archive_version), so a tag vX.Y.Z may only
package a tree whose pyproject.toml says version X.Y.Z: otherwise the .mar files published under the tag
would carry another version. Exits 1 when they differ; with no tag it says the build is untagged.
"""

from __future__ import annotations

import argparse
import sys

from tsforge.project import ROOT, project_version


def tag_version(tag: str) -> str:
    """v0.1.0 -> 0.1.0 (refs/tags/ is dropped too)."""
    tag = tag.removeprefix("refs/tags/")
    return tag[1:] if tag[:1] in ("v", "V") else tag


def check_tag(tag: str, version: str) -> str | None:
    """None when `tag` names `version`, else the problem."""
    if tag_version(tag) != version:
        return f"tag {tag} names version {tag_version(tag)}, but pyproject.toml says {version}: bump one of them"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.packaging.release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-tag", help="fail unless TAG names pyproject's version")
    check.add_argument("tag", nargs="?", default="", help="the release tag, e.g. v0.1.0 (empty: untagged build)")
    args = parser.parse_args(argv)
    version = project_version(ROOT)
    if not args.tag:
        print(f"no tag given: packaging version {version} untagged")
        return 0
    problem = check_tag(args.tag, version)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    print(f"tag {args.tag} = version {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
