#!/bin/bash
# A hook script: runs the command the test put in HOOK_COMMAND (word-split on purpose).
$HOOK_COMMAND
