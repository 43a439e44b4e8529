"""Process plumbing shared by every Potluck process (peer, coordinator, tools); imports nothing of ours."""
