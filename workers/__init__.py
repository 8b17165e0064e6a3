"""The child roles the supervisor starts: the watcher and the uploaders."""
