package main

import (
	"context"
	"fmt"

	"github.com/spf13/pflag"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	kcm "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kcmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	scheduleroptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

// startControllerManager follows cmd/kube-controller-manager/app/testing/testserver.go at v1.37.2:
// options from flags -> Config(KnownControllers()...) -> app.Run. Each controller runs under its own
// ServiceAccount in kube-system (--use-service-account-credentials, as kubeadm does), so they pass
// RBAC with the bootstrap system:controller:* roles.
func startControllerManager(ctx context.Context, p *pki, controllers string) (<-chan error, error) {
	s, err := kcmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return nil, err
	}
	all, disabled, aliases := kcm.KnownControllers(), kcm.ControllersDisabledByDefault(), kcm.ControllerAliases()
	named := s.Flags(all, disabled, aliases)
	fs := pflag.NewFlagSet("kube-controller-manager", pflag.ContinueOnError)
	for _, f := range named.FlagSets {
		fs.AddFlagSet(f)
	}
	args := []string{
		"--kubeconfig=" + p.path("kube-controller-manager.kubeconfig"),
		"--leader-elect=false",
		"--secure-port=0", // no serving endpoint (it would listen on every interface)
		"--controllers=" + controllers,
		"--use-service-account-credentials=true",
		"--service-account-private-key-file=" + p.path("sa.key"),
		"--root-ca-file=" + p.path("ca.crt"),
		"--cluster-signing-cert-file=" + p.path("ca.crt"),
		"--cluster-signing-key-file=" + p.path("ca.key"),
		"--service-cluster-ip-range=" + serviceCIDR,
		"--profiling=false",
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	s.ParsedFlags = &named
	if err := s.ComponentGlobalsRegistry.Set(); err != nil {
		return nil, err
	}
	c, err := s.Config(ctx, all, disabled, aliases)
	if err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() {
		defer close(done)
		klog.InfoS("kube-controller-manager starting", "controllers", controllers)
		done <- kcm.Run(ctx, c.Complete())
	}()
	return done, nil
}

// startScheduler follows cmd/kube-scheduler/app/testing/testserver.go at v1.37.2: options from flags
// -> app.Setup -> app.Run (not NewSchedulerCommand, which installs a second signal handler).
func startScheduler(ctx context.Context, p *pki) (<-chan error, error) {
	opts := scheduleroptions.NewOptions()
	fs := pflag.NewFlagSet("kube-scheduler", pflag.ContinueOnError)
	for _, f := range opts.Flags.FlagSets {
		fs.AddFlagSet(f)
	}
	args := []string{
		"--kubeconfig=" + p.path("kube-scheduler.kubeconfig"),
		"--leader-elect=false",
		"--secure-port=0",
		"--profiling=false",
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if err := opts.ComponentGlobalsRegistry.Set(); err != nil {
		return nil, err
	}
	informerName, err := cache.NewInformerName("kube-scheduler")
	if err != nil {
		return nil, err
	}
	opts.InformerName = informerName
	cc, sched, err := scheduler.Setup(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}
	done := make(chan error, 1)
	go func() {
		defer close(done)
		klog.InfoS("kube-scheduler starting")
		done <- scheduler.Run(ctx, cc, sched)
	}()
	return done, nil
}
