-- Back to the layout before the API schema: drop pyswpt_api and pyswpt_private.
-- The earlier release's apply re-installs its functions into pyswpt.
DROP SCHEMA IF EXISTS pyswpt_api CASCADE;
DROP SCHEMA IF EXISTS pyswpt_private CASCADE;
