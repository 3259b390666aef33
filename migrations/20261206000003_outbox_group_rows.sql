-- One outbox row per finalize group instead of one per message: a group's messages (each job's
-- result, the group's cost and audit event arrays, dead-letter copies) are the elements of one
-- row's arrays, in publishing order. Per job that saves a heap insert, two index entries, a
-- delete and the dead tuple vacuum later removes, for a row that lives a few milliseconds.
-- A result still points at its `results` row (`result_job_ids`, `result_generations`, with a
-- NULL body element) instead of copying its body. Rows already stored become one-message rows.
ALTER TABLE outbox DROP CONSTRAINT outbox_body_or_result;
ALTER TABLE outbox ALTER COLUMN headers DROP DEFAULT;
ALTER TABLE outbox
    ALTER COLUMN message_id TYPE text[] USING ARRAY[message_id],
    ALTER COLUMN exchange TYPE text[] USING ARRAY[exchange],
    ALTER COLUMN routing_key TYPE text[] USING ARRAY[routing_key],
    ALTER COLUMN kind TYPE text[] USING ARRAY[kind],
    -- NULL elements for messages without headers.
    ALTER COLUMN headers TYPE jsonb[] USING ARRAY[NULLIF(headers, '{}'::jsonb)],
    ALTER COLUMN body TYPE bytea[] USING ARRAY[body],
    ALTER COLUMN result_job_id TYPE uuid[] USING ARRAY[result_job_id],
    ALTER COLUMN result_generation TYPE int4[] USING ARRAY[result_generation];
ALTER TABLE outbox RENAME COLUMN message_id TO message_ids;
ALTER TABLE outbox RENAME COLUMN exchange TO exchanges;
ALTER TABLE outbox RENAME COLUMN routing_key TO routing_keys;
ALTER TABLE outbox RENAME COLUMN kind TO kinds;
ALTER TABLE outbox RENAME COLUMN body TO bodies;
ALTER TABLE outbox RENAME COLUMN result_job_id TO result_job_ids;
ALTER TABLE outbox RENAME COLUMN result_generation TO result_generations;
ALTER TABLE outbox
    ALTER COLUMN bodies SET NOT NULL,
    ALTER COLUMN result_job_ids SET NOT NULL,
    ALTER COLUMN result_generations SET NOT NULL;
ALTER TABLE outbox ADD CONSTRAINT outbox_messages_line_up CHECK (
    cardinality(message_ids) > 0
    AND cardinality(exchanges) = cardinality(message_ids)
    AND cardinality(routing_keys) = cardinality(message_ids)
    AND cardinality(kinds) = cardinality(message_ids)
    AND cardinality(headers) = cardinality(message_ids)
    AND cardinality(bodies) = cardinality(message_ids)
    AND cardinality(result_job_ids) = cardinality(message_ids)
    AND cardinality(result_generations) = cardinality(message_ids));
-- A group's row is tens of KB (its event arrays, and a message id, routing key and result
-- reference per job), so Postgres compresses it before storing, with pglz unless told
-- otherwise: lz4 for every array, as for the bodies since 20261205000000, or no compression
-- on a server built without lz4.
DO $$
DECLARE
    array_column text;
BEGIN
    FOREACH array_column IN ARRAY ARRAY['message_ids', 'exchanges', 'routing_keys', 'kinds',
                                        'headers', 'bodies', 'result_job_ids', 'result_generations']
    LOOP
        BEGIN
            EXECUTE format('ALTER TABLE outbox ALTER COLUMN %I SET COMPRESSION lz4', array_column);
        EXCEPTION WHEN feature_not_supported THEN
            EXECUTE format('ALTER TABLE outbox ALTER COLUMN %I SET STORAGE EXTERNAL', array_column);
        END;
    END LOOP;
END
$$;
