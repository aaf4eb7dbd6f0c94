"""Bounded cost per connection: caps at accept, the fd limit, memory handed back after floods."""
