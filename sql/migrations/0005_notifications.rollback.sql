DROP FUNCTION pyswpt.notify_table_filled() CASCADE;
