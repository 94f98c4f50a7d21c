{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "zvt-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zvt-fleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "zvt-fleet.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "zvt-fleet.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of one service's objects: <fullname>-<service>. Call with (list $ "risk"). */}}
{{- define "zvt-fleet.component" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "zvt-fleet.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zvt-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "zvt-fleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------------------------- */}}

{{- define "zvt-fleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "zvt-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: zvt-fleet
{{- end -}}

{{- define "zvt-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zvt-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* One service's selector labels. Call with (list $ "risk"). */}}
{{- define "zvt-fleet.componentSelector" -}}
{{ include "zvt-fleet.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "zvt-fleet.componentLabels" -}}
{{ include "zvt-fleet.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The image reference: digest wins over tag; tag defaults to appVersion. */}}
{{- define "zvt-fleet.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The services, each merged over serviceDefaults once, here, with the chart's rules checked;
every template reads this (fromJson) instead of merging on its own. Only enabled services.
*/}}
{{- define "zvt-fleet.services" -}}
{{- $out := dict -}}
{{- range $name, $own := .Values.services -}}
{{- $svc := mustMergeOverwrite (deepCopy $.Values.serviceDefaults) (deepCopy ($own | default dict)) -}}
{{- if $svc.enabled -}}
{{- if not $svc.module -}}{{- $_ := set $svc "module" (printf "services.%s" $name) -}}{{- end -}}
{{- $drain := float64 $svc.drainTimeoutSeconds -}}
{{- $grace := float64 $svc.terminationGracePeriodSeconds -}}
{{- if le $grace (addf $drain $svc.preStopSleepSeconds) -}}
{{- fail (printf "services.%s: terminationGracePeriodSeconds (%v) must exceed drainTimeoutSeconds (%v) + preStopSleepSeconds (%v)" $name $svc.terminationGracePeriodSeconds $svc.drainTimeoutSeconds $svc.preStopSleepSeconds) -}}
{{- end -}}
{{- if and (has $svc.role (list "stage" "consumer")) (not $svc.consumerGroup) -}}
{{- fail (printf "services.%s: a %s needs consumerGroup" $name $svc.role) -}}
{{- end -}}
{{- if and $svc.autoscaling.enabled (eq $svc.autoscaling.trigger "lag") (not $svc.consumerGroup) -}}
{{- fail (printf "services.%s: autoscaling.trigger lag needs consumerGroup" $name) -}}
{{- end -}}
{{- if and $svc.autoscaling.enabled (gt (int $svc.autoscaling.minReplicas) (int $svc.autoscaling.maxReplicas)) -}}
{{- fail (printf "services.%s: autoscaling.minReplicas exceeds maxReplicas" $name) -}}
{{- end -}}
{{- if and (eq $svc.role "stage") $svc.autoscaling.enabled (gt (int $svc.autoscaling.maxReplicas) (int $.Values.bus.shards)) -}}
{{- fail (printf "services.%s: an exclusive stage owns whole shards; autoscaling.maxReplicas (%v) must not exceed bus.shards (%v)" $name $svc.autoscaling.maxReplicas $.Values.bus.shards) -}}
{{- end -}}
{{- if and (eq $name "notifications") (not (index $svc.env "ZVT_NOTIFICATIONS_WEBHOOK_URLS")) -}}
{{- fail "services.notifications: set env.ZVT_NOTIFICATIONS_WEBHOOK_URLS (comma-separated webhook URLs) or disable the service" -}}
{{- end -}}
{{- if and (eq $svc.probes.port "api") (not $svc.apiPort) -}}
{{- fail (printf "services.%s: probes.port api needs apiPort" $name) -}}
{{- end -}}
{{- range $env, $ref := $svc.secretEnv -}}
{{- if not (hasKey $.Values.secrets $ref) -}}
{{- fail (printf "services.%s.secretEnv.%s: %q is not an entry of secrets" $name $env $ref) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $out $name $svc -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The Prometheus selector of one service's series: its namespace and Service. */}}
{{- define "zvt-fleet.promSelector" -}}
{{- $root := index . 0 -}}
namespace="{{ $root.Release.Namespace }}", service="{{ include "zvt-fleet.component" . }}"
{{- end -}}

{{/* The consumer-group lag of one service's group over all streams and shards. Replicas of a
non-exclusive group report the same shards, so take one value per (stream, shard) first. */}}
{{- define "zvt-fleet.lagQuery" -}}
{{- $root := index . 0 -}}
{{- $svc := index . 2 -}}
sum(max by (stream, shard) (zvt_bus_lag{ {{- include "zvt-fleet.promSelector" (list $root (index . 1)) }}, group="{{ $svc.consumerGroup }}"}))
{{- end -}}

{{/* Hatchet's queued tasks (the engine's hatchet_tenant_queue_size gauge, safe to sum). */}}
{{- define "zvt-fleet.hatchetQuery" -}}
{{- $h := .Values.hatchet -}}
{{- $sel := list -}}
{{- if $h.tenantId -}}{{- $sel = append $sel (printf "tenant_id=%q" $h.tenantId) -}}{{- end -}}
{{- if $h.namespace -}}{{- $sel = append $sel (printf "workflow_name=~%q" (printf "%s.*" $h.namespace)) -}}{{- end -}}
{{- if $sel -}}
sum(hatchet_tenant_queue_size{ {{- join ", " $sel -}} })
{{- else -}}
sum(hatchet_tenant_queue_size)
{{- end -}}
{{- end -}}

{{/* TLS material mounted into every service pod: (name, mount path, source) of each CA or
client certificate configured; the chart refuses a CA named by both a Secret and a ConfigMap,
and a CA for Redis without a rediss:// URL. */}}
{{- define "zvt-fleet.tlsSources" -}}
{{- $out := list -}}
{{- range $what, $ca := dict "redis" .Values.redis.tls.ca "postgres" .Values.postgres.ca -}}
{{- if and $ca.secret $ca.configMap -}}
{{- fail (printf "%s: name either secret or configMap, not both" (ternary "redis.tls.ca" "postgres.ca" (eq $what "redis"))) -}}
{{- end -}}
{{- if or $ca.secret $ca.configMap -}}
{{- $out = append $out (dict "name" (printf "%s-ca" $what) "path" (printf "/etc/zvt/tls/%s-ca" $what) "secret" $ca.secret "configMap" $ca.configMap "key" $ca.key) -}}
{{- end -}}
{{- end -}}
{{- with .Values.redis.tls.clientCertSecret -}}
{{- $out = append $out (dict "name" "redis-client" "path" "/etc/zvt/tls/redis-client" "secret" . "configMap" "" "key" "") -}}
{{- end -}}
{{- if and (or .Values.redis.tls.ca.secret .Values.redis.tls.ca.configMap .Values.redis.tls.clientCertSecret) (not (hasPrefix "rediss://" .Values.redis.url)) (not .Values.secrets.redisUrl.name) -}}
{{- fail "redis.tls: a CA or client certificate needs a rediss:// redis.url (TLS)" -}}
{{- end -}}
{{- toJson (dict "sources" $out) -}}
{{- end -}}
