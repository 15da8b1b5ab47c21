//! `kvplane replay --engines` (issue 6): the trace through the router to simulated engines on real daemons.
