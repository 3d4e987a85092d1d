-- Accounts with a change no AccountUpdate announced yet, by when they last sent
-- one: the prompt-updates loop of the workers finds the due ones through this
-- index instead of waiting for the accounts scanner (issue 12). Only pending
-- accounts are in it, so it stays small whatever the number of idle accounts.

CREATE INDEX account_pending_update_idx
    ON pyswpt.account (last_heartbeat_ts)
    WHERE pending_account_update;
