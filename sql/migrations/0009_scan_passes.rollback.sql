DROP TABLE pyswpt.scan_pass;
