#!/bin/sh
# fleetd alert hook: mail an event to an operator.
#
#   [[alerts.hooks]]
#   kind = "exec"
#   target = "/usr/lib/fleetd/hooks/notify-email.sh"
#   events = ["worker.failed", "gpu."]
#
# fleetd passes the event as JSON on stdin and key facts in the environment:
# FLEETD_EVENT_KIND, FLEETD_EVENT_MESSAGE, FLEETD_EVENT_SEQ, FLEETD_EVENT_SEVERITY and,
# when the event has them, FLEETD_WORKER, FLEETD_GPU, FLEETD_GPU_UUID, FLEETD_MODEL.
# Nothing else of fleetd's environment reaches the hook (only PATH, LANG, HOME), so the
# recipient is set here. Without a `mail` command (mailutils, s-nail, bsd-mailx) the hook
# prints what it would send, which also makes it easy to try by hand:
#   echo '{"kind":"gpu.lost"}' | FLEETD_EVENT_KIND=gpu.lost FLEETD_EVENT_MESSAGE=test \
#     FLEETD_EVENT_SEQ=1 ./notify-email.sh
set -eu

MAILTO="root"  # edit: who gets fleetd alerts

host=$(uname -n)
about="${FLEETD_WORKER:-${FLEETD_GPU_UUID:-${FLEETD_GPU:-${FLEETD_MODEL:-}}}}"
subject="[fleetd ${host}] ${FLEETD_EVENT_SEVERITY:-alert}: ${FLEETD_EVENT_KIND}${about:+ (${about})}"
event_json=$(cat)  # read stdin once, before anything else can

fact() {  # "Name:    value", only when there is a value
  [ -z "$2" ] || printf '%-9s %s\n' "$1:" "$2"
}

body=$(
  printf '%s\n\n' "${FLEETD_EVENT_MESSAGE}"
  fact Event "${FLEETD_EVENT_KIND} #${FLEETD_EVENT_SEQ}"
  fact Host "${host}"
  fact Worker "${FLEETD_WORKER:-}"
  fact GPU "${FLEETD_GPU:-}"
  fact "GPU UUID" "${FLEETD_GPU_UUID:-}"
  fact Model "${FLEETD_MODEL:-}"
  printf '\nThe full event:\n%s\n' "${event_json}"
)

if command -v mail >/dev/null 2>&1; then
  printf '%s\n' "${body}" | mail -s "${subject}" "${MAILTO}"
else
  printf 'mail(1) not found; would send to %s:\nSubject: %s\n\n%s\n' \
    "${MAILTO}" "${subject}" "${body}"
fi
