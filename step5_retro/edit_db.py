"""Change what the model knows by editing its book: no training, no weight touched.

    python step5_retro/edit_db.py --edits my_edits.json      # out/step5/db edited in place
    python step5_retro/edit_db.py --example                  # writes out/step5/example_edits.json to start from

my_edits.json is a list of facts to rewrite:

    [{"entity": "Halra", "relation": "lives_in", "value": "Caldford"},
     {"entity": "Wendel", "relation": "favorite_color", "value": "green"}]

Every fact sheet that states an edited fact is rewritten (the entity's own sheet, and the sheet of the
town, friend or pet it names), and only those documents are re-chunked, re-embedded and re-indexed.
Ask again (ask.py) and the answer follows the book.
"""
import argparse
import json
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.checkpoint import atomic_write_text
from common.cli import UserError, add_common_args, next_command, run_main
from common.paths import step_dir
from step5_retro.book import edit_book, extended_world
from step5_retro.database import load_database


def read_edits(path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: edits file not found; {next_command('python step5_retro/edit_db.py --example')} "
                        "writes one to start from")
    try:
        edits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(edits, list) or not edits:
        raise UserError(f'{path}: expected a non-empty list like [{{"entity": ..., "relation": ..., "value": ...}}]')
    return edits


def example_edits(quick: bool) -> list[dict]:
    """Two edits: a newcomer moves to another town, an old resident changes favourite colour."""
    world, newcomers = extended_world(quick)
    mover, resident = newcomers[0], world.names("person")[0]
    town = next(p for p in world.names("place") if p != world.fact(mover, "lives_in"))
    color = next(c for c in ("green", "blue") if c != world.fact(resident, "favorite_color"))
    return [{"entity": mover, "relation": "lives_in", "value": town},
            {"entity": resident, "relation": "favorite_color", "value": color}]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", default=None, help="JSON list of {entity, relation, value}")
    parser.add_argument("--example", action="store_true", help="write an example edits file and stop")
    parser.add_argument("--db", default=None, help="database folder (default out/step5/db)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.example:
        path = step_dir(5) / "example_edits.json"
        atomic_write_text(path, json.dumps(example_edits(args.quick), indent=1) + "\n")
        print(f"wrote {path}\nnext: {next_command(f'python step5_retro/edit_db.py --edits {path}')}")
        return {"example": str(path)}
    if not args.edits:
        parser.error("give --edits FILE (or --example to write one)")
    edits = read_edits(args.edits)
    db = load_database(args.db or step_dir(5) / "db", args.tokenizer)
    result = edit_book(db, edits)
    print(f"{len(edits)} edits: rewrote {len(result['documents_rewritten'])} documents "
          f"({', '.join(result['documents_rewritten'])}); {result['removed_chunks']} chunks out of the index, "
          f"{result['added_chunks']} in, {result['new_neighbour_rows']} neighbour rows recomputed; no weight changed")
    print(f"next: {next_command('python step5_retro/ask.py --show_neighbours')} \"<a question about an edited fact>\"")
    return result


if __name__ == "__main__":
    run_main(main)
