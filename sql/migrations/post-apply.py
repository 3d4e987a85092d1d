"""
Forget that 9999_functions was applied, so that the next `yoyo apply` finds it
pending and re-installs the functions. yoyo runs post-apply hooks only when
something was applied, which is why the re-install is a migration of its own.
"""

from yoyo import step

steps = [step("DELETE FROM _yoyo_migration WHERE migration_id = '9999_functions'")]
