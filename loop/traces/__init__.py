"""The trace log (`log`: every served request as a TraceRecord, and outcome feedback) and the import
of a team's own chat-completion logs into it (`importer`, `loopctl traces import`)."""
