-- Removes every table and function of the ledger.
DROP SCHEMA pyswpt CASCADE;
