#!/bin/bash
# Stands in for an ACME client that is a script itself (dehydrated, acme.sh): runs a hook script,
# then waits to be killed. Checked in, not written by the test, so no fd of a just-written script
# can be open in a process another test forks (exec would fail with "Text file busy").
"$(dirname "$0")/hook.sh"
sleep 120
