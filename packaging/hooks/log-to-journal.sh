#!/bin/sh
# fleetd alert hook: write an event to the journal (or syslog) through logger(1).
#
#   [[alerts.hooks]]
#   kind = "exec"
#   target = "/usr/lib/fleetd/hooks/log-to-journal.sh"
#   events = ["*"]   # every problem event
#
# Find the lines with `journalctl -t fleetd-alert`. The priority follows the event's
# severity, so `journalctl -t fleetd-alert -p crit` shows lost GPUs and failed workers.
# fleetd passes the event as JSON on stdin (one line) and its kind, message and sequence
# number in FLEETD_EVENT_KIND, FLEETD_EVENT_MESSAGE, FLEETD_EVENT_SEQ.
set -eu

case "${FLEETD_EVENT_SEVERITY:-warning}" in
  critical) priority=user.crit ;;
  warning) priority=user.warning ;;
  *) priority=user.info ;;
esac

event_json=$(cat)
logger -t fleetd-alert -p "${priority}" -- \
  "${FLEETD_EVENT_KIND}: ${FLEETD_EVENT_MESSAGE} ${event_json}"
