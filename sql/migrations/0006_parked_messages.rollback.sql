DROP TABLE pyswpt.parked_message_overflow;
DROP TABLE pyswpt.parked_message;
