{{/* Names, labels and the shared pieces of the intentd chart. */}}

{{- define "intentd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "intentd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "intentd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object, without a component. */}}
{{- define "intentd.baseLabels" -}}
helm.sh/chart: {{ include "intentd.chart" . }}
app.kubernetes.io/name: {{ include "intentd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: intentd
{{- end -}}

{{/* Labels of the control plane's objects. */}}
{{- define "intentd.labels" -}}
{{ include "intentd.baseLabels" . }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{- define "intentd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "intentd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{- define "intentd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "intentd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "intentd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret holding INTENTD_DATABASE_URL and its key. */}}
{{- define "intentd.databaseSecretName" -}}
{{- default (printf "%s-database" (include "intentd.fullname" .)) .Values.database.existingSecret -}}
{{- end -}}

{{- define "intentd.databaseSecretKey" -}}
{{- if .Values.database.existingSecret -}}{{ .Values.database.existingSecretKey }}{{- else -}}database-url{{- end -}}
{{- end -}}

{{/* Fails rendering on combinations the schema cannot express. */}}
{{- define "intentd.validate" -}}
{{- $db := .Values.database -}}
{{- if and (not $db.url) (not $db.existingSecret) -}}
{{- fail "database: set database.url (a postgresql:// URL) or database.existingSecret (a Secret with the URL under database.existingSecretKey)" -}}
{{- end -}}
{{- if and $db.url $db.existingSecret -}}
{{- fail "database: set only one of database.url and database.existingSecret" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key" -}}
{{- end -}}
{{- $drain := add (int .Values.lifecycle.preStopSleepSeconds) (ceil .Values.config.shutdownGraceS | int) -}}
{{- if le (int .Values.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + config.shutdownGraceS (%d), or replicas are killed mid-drain" (int .Values.terminationGracePeriodSeconds) $drain) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and .Values.agentExample.enabled (not .Values.agentExample.addresses) -}}
{{- fail "agentExample.addresses needs at least one agent://<org>/<env>/<name>" -}}
{{- end -}}
{{- end -}}

{{/*
A settings value as an environment string. Helm reads every number in values
as a float64, which prints 4194304 as "4.194304e+06"; whole numbers print as
integers here, so the server parses them with int().
*/}}
{{- define "intentd.envValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq . (floor .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* The security context every intentd container runs with. */}}
{{- define "intentd.containerSecurityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end -}}

{{/*
The `intentd sidecar` container for an agent pod. The agent reaches it on a
unix socket in a volume both containers mount at /var/run/intentd; give the
agent INTENTD_SIDECAR_ADDRESS=unix:///var/run/intentd/agent.sock and run both
containers as the same user (the socket is mode 0600).

  {{- include "intentd.sidecarContainer" (dict
        "root" $                                  (required: the chart context)
        "addresses" (list "agent://acme/prod/x")  (required)
        "intentTypes" (list)                      (optional; empty means all)
        "capacity" 10                             (optional; sidecar.capacity)
        "server" "intentd:7300"                   (optional; this release's Service)
        "socketVolume" "intentd-socket"           (optional; the shared emptyDir)
      ) | nindent 8 }}
*/}}
{{- define "intentd.sidecarContainer" -}}
{{- $root := .root -}}
{{- $sc := $root.Values.sidecar -}}
{{- $server := default (printf "%s:%d" (include "intentd.fullname" $root) (int $root.Values.service.port)) .server -}}
{{- $capacity := default $sc.capacity .capacity -}}
- name: intentd-sidecar
  image: {{ printf "%s:%s" $sc.image.repository (default $root.Chart.AppVersion $sc.image.tag) | quote }}
  imagePullPolicy: {{ $sc.image.pullPolicy }}
  args: ["sidecar"]
  env:
    - name: INTENTD_SERVER
      value: {{ $server | quote }}
    - name: INTENTD_ADDRESSES
      value: {{ join "," .addresses | quote }}
    {{- with .intentTypes }}
    - name: INTENTD_INTENT_TYPES
      value: {{ join "," . | quote }}
    {{- end }}
    - name: INTENTD_AGENT_LISTEN
      value: "unix:///var/run/intentd/agent.sock"
    - name: INTENTD_CAPACITY
      value: {{ include "intentd.envValue" $capacity | quote }}
    - name: INTENTD_DRAIN_GRACE_S
      value: {{ include "intentd.envValue" $sc.drainGraceS | quote }}
    - name: INTENTD_LOG_LEVEL
      value: {{ $sc.logLevel | quote }}
  # Alive while it accepts connections on the agent socket.
  livenessProbe:
    exec:
      command: ["python", "/usr/local/bin/intentd-healthcheck", "sidecar"]
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $sc.resources | nindent 4 }}
  volumeMounts:
    - name: {{ default "intentd-socket" .socketVolume }}
      mountPath: /var/run/intentd
{{- end -}}

{{/* The port kubelet's gRPC probes use: the plaintext health port when TLS is on. */}}
{{- define "intentd.probePort" -}}
{{- if .Values.tls.enabled }}{{ .Values.service.healthPort }}{{ else }}{{ .Values.service.port }}{{ end -}}
{{- end }}
