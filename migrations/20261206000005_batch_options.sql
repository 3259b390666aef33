-- What shaped a summarize batch's steps (route, summary cap, piece size, prompt). A resumed
-- run with other options is refused: its pieces would not line up with the stored ones, and
-- a document would be put together from pieces of two shapes. NULL for OpenAI batches and for
-- summarize batches started before this column.
ALTER TABLE batches ADD COLUMN options text;
