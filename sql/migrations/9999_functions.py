"""
Install every file of sql/functions/ (CREATE OR REPLACE), in name order.

This migration is never recorded as applied (see post-apply.py), so each
`yoyo apply` runs it again: a changed function needs no new migration.
"""

from pathlib import Path

from yoyo import step

FUNCTIONS_DIR = Path(__file__).resolve().parent.parent / "functions"


def install_functions(conn):
    cursor = conn.cursor()
    cursor.execute("SET LOCAL search_path = pyswpt, pg_catalog")
    for path in sorted(FUNCTIONS_DIR.glob("*.sql")):
        cursor.execute(path.read_text(encoding="utf-8"))


steps = [step(install_functions)]
