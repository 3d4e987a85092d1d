"""The table scanners (`pyswpt run scan-*`): a shared engine (engine.py) and one
module per scanned table, whose steps are SQL functions of sql/functions/70_scans.sql."""
